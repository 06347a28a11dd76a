"""What runs the kit but is not shipped to Kaggle: the synthetic data, fault injection, the notebook
runner, the Kaggle bundle and the run summary."""
