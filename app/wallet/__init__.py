"""Pure pass building (no database): Apple templates, images, packaging and signing; Google
object bodies; previews."""
