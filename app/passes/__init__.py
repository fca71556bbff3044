"""Apple Wallet pass building: templates, images, packaging and signing."""
