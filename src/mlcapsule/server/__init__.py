"""The provider's provisioning server (DESIGN §9).

* :mod:`.settings` :class:`ServerSettings` from flags, environment and a TOML file
* :mod:`.db`       SQLAlchemy models, engine (SQLite or PostgreSQL)
* :mod:`.service`  the transactional rules, separate from HTTP
* :mod:`.app`      :func:`create_app`, the FastAPI factory
* :mod:`.client`   a re-export of :class:`mlcapsule.provider_client.ProviderClient`, what the
                   client machine uses to talk to the server (kept for compatibility)

The server needs the ``server`` extra: ``pip install 'mlcapsule[server]'``. Importing this
package does not import FastAPI or SQLAlchemy; the submodules do.
"""
