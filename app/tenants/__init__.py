"""Setting up a brand: tenants, Apple identities, programs; the demo seed."""
