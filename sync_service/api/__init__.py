"""The edge: the gRPC SyncService (servicer), its wire mapping (convert), Sync's read-ahead (inbox).

It converts, calls writes/ or storage/, converts back; nothing decides here.
"""
