"""The search spaces shipped with mnv3-search; installed as the package data mnv3_search.search_spaces."""
