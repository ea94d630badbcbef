"""deltadiff.runtime"""
