"""Static figures (matplotlib/seaborn), one module per theme."""
