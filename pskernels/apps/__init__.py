"""Applications on top of the library: the demo, the TTFT benchmark, training / evaluation and the command line."""
