"""Inference: ASE calculator, relaxation, molecular dynamics, batched simulation."""
