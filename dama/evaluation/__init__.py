"""Evaluation: what a trained model says (`dama generate`) and how much of it is hallucinated (`dama eval-chair`)."""
