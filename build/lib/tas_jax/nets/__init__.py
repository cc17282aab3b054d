"""The networks: the pruned ResNets, the TAS supernet and the one home of weight surgery."""
