"""The Azure ML backend (azure-ai-ml v2): the seed notebook's workflow as real azure-ai-ml objects.

Import-free on purpose: azure.ai.ml costs ~1.5 s to import, so each module imports it inside the functions that
need it. Modules: clients (the one seam to Azure), tags (model facts), spec (component inputs), checks, translate
(config → entities), backend (the steps), planning (the recording clients of a dry run), metrics (MLflow),
scoring (endpoint replies); components/ holds the recorded component contract.
"""
