"""edgeq.cpu_kernels"""
from edgeq._numba_env import local_linked_copies

local_linked_copies()  # before any kernel compiles: the same bits in the process that compiles a kernel as in later ones
