"""`make bench`: tools/call round trips through the broker against a direct connection."""
