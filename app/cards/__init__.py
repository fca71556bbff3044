"""Cards: one customer in one program; issuing, rendering inputs, content versions."""
