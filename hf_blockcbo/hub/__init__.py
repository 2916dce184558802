"""Publishing: model cards, pushes and artifacts on the Hugging Face Hub."""
