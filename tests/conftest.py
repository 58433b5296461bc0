import os

import pytest
import torch

# Without CUDA the Triton kernels can only run in the interpreter, which must be selected before triton is
# imported anywhere. With CUDA the compiled, autotuned kernels run (TRITON_INTERPRET=1 still forces the
# interpreter when set by hand).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _single_thread():
    """One intra-op thread: on 2 shared cores it avoids OpenMP oversubscription stalls when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


one_thread = pytest.fixture(_single_thread, name="one_thread")
# the same for a whole module (its module-scoped fixtures included: pytestmark = usefixtures("one_thread_module"))
one_thread_module = pytest.fixture(_single_thread, scope="module", name="one_thread_module")
