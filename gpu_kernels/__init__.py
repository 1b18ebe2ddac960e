"""edgeq.gpu_kernels"""
