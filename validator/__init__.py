"""ssm-golf validator: checks Parameter Golf submission folders and pull requests, statically and by re-execution."""
