"""ssm-golf builder: assembles variants from templates/ into submission folders, runs them and collects results."""
