"""The fusion service: merges several drafters' trees for one request into one token tree."""
