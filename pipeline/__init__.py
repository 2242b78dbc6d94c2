"""Instance segmentation over image archives on Ray: the library behind ``jobs``."""
