"""deltadiff.benchmarks"""
