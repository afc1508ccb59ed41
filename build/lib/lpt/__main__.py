from lpt.cli import app

app()
