"""edgeq.cpu_kernels"""
from edgeq._numba_env import import_numba, local_linked_copies, plain_array_typeof

import_numba()  # the first import of Numba, without PyYAML's import where it has no file to read
plain_array_typeof()  # numpy arrays typed without importing numpy.ma (its MaskedArray check)
local_linked_copies()  # before any kernel compiles: the same bits in the process that compiles a kernel as in later ones
