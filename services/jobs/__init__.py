"""The jobs core: the job lifecycle (every transition and its event), its records, and the
reconciler that repairs from Postgres whatever Redis lost."""
