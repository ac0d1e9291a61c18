"""An exported classifier put to use: batched classification, calibrated probabilities, `carbrand
predict`, Grad-CAM and its overlays, `carbrand explain` and `carbrand export`.
Depends on prepare/ (raw folders), data/ and the core."""
