"""npu packages: static-shape graphs and their QDQ export."""
