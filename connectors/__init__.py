"""Downstream tool providers behind one `Connector` protocol; never imports `broker`."""
