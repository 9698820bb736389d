"""Activation stores: the dump job writes them (`dump.dump`, `microscope dump`), `open_store` reads them."""
