from microscope.cli import app

app()
