"""The API's routes, one module per resource; each is an APIRouter the app includes."""
