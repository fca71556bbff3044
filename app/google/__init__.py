"""Google Wallet: classes, objects, save links, REST client and callbacks."""
