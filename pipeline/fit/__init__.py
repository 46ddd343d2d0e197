"""Stage `fit`: train TopK SAEs and RouteSAEs from a cache, a whole sweep from one read. The entry
point is :func:`pipeline.fit.stage.run`."""
