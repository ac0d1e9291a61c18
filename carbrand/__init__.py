"""carbrand: teach a ResNet-50 to tell a car's brand from a photo, at cluster scale."""

__version__ = "0.1.0"
