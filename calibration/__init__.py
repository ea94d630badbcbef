"""deltadiff.calibration"""
