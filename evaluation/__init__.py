"""Evaluation of the world models and the controller, calibration of tool thresholds, the shifted eval set
kept apart from training, and the results page generated from the metrics JSON."""
