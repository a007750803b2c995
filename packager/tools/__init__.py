"""One wrapper per external program. Nothing outside this package calls ``subprocess``."""
