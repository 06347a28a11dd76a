"""The trained stages: vertebra localisation (02), the CNN + BiLSTM forms (03), the 3D ViT (04)."""
