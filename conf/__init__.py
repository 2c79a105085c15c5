"""interpzoo's Hydra configs, shipped as package data (``interpzoo.conf``; the checkout's ``conf/`` folder).

Importing this package registers the structured schemas the entry configs build on
(:mod:`interpzoo.config_schema`), so compose through :mod:`interpzoo.cli`, :mod:`interpzoo.api` or after
``import interpzoo.conf``.
"""

from interpzoo.config_schema import register_configs

register_configs()
