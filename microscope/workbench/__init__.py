"""The workbench: experiment specs and their runner (`experiments`), the shipped spec library
(`specs/`), the demo (`demo`), the HTML report (`report`) and progress bars (`progress`)."""
