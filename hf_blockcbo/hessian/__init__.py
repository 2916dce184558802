"""The energy matrix: gate gradients, curvature estimators, the artifact, resume and distributed passes."""
