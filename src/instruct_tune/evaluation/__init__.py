"""Evaluation of trained models: metrics computed from their scores, shared by the stages that report them."""
