"""Cryptographic building blocks. Everything here calls pyca `cryptography`; nothing is hand-made."""
