"""Evaluation: FID / KID / precision / recall (genuine Inception), FD-digits and accuracy (the shipped digits
classifier), grain, CLIP score, and sample generation for them. No training happens here.

``from stepdistill.eval.harness import evaluate`` is the one entry point of every metric.
"""
