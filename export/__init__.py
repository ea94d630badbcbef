"""deltadiff.export"""
