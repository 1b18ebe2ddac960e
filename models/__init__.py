"""edgeq.models"""
