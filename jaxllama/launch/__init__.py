"""Launchers that start ``jaxllama`` on several processes (``local``: N processes on this machine)."""
