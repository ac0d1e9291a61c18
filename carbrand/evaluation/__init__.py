"""What the evaluator (carbrand/evaluate.py) reports and the calibration fit: the metrics and files of
an evaluation, report.html, calibration and open-set figures, and `carbrand calibrate`.
Depends on inference/, data/ and the core."""
