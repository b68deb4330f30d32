"""longred.train"""
