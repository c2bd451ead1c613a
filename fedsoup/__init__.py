"""FedSoup: weight-space model merging by Amortized Model Ensembling (AME)."""
