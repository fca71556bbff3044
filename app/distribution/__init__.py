"""Handing cards out: personal links, landing offers, enrollment and details forms, card
emails, page language and branding."""
