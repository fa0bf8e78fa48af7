"""The local online endpoint: a FastAPI server process with dynamic batching, and the manager that starts/stops it.

Import-free on purpose (ftrun imports the manager on its start-up path; the server imports torch only when it loads
a model).
"""
